"""Mail: security alerts and single-use links, delivered reliably through a transactional outbox.

- :mod:`qpki.mail.notifier` queues a mail inside the caller's transaction (typed alert API).
- :mod:`qpki.mail.outbox` claims, sends, retries and gives up; :mod:`qpki.mail.dispatcher` runs
  it in a background thread; :mod:`qpki.mail.transport` speaks SMTP or writes .eml files.
- :mod:`qpki.mail.render` builds the text and HTML parts from ``templates/mail``.
"""

from qpki.mail.alerts import Alert, LinkMail
from qpki.mail.notifier import Notifier

__all__ = ["Alert", "LinkMail", "Notifier"]
