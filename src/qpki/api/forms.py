"""The form of the ``/admin/api-keys`` page (the rules — names, scopes, expiry — are checked by
:class:`qpki.auth.services.api_keys.ApiKeyService`; the form only carries the fields)."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import IntegerField, SelectMultipleField, StringField, SubmitField, widgets
from wtforms.fields.choices import SelectChoice
from wtforms.validators import DataRequired, Length, NumberRange, Optional

from qpki.auth.services.api_keys import MAX_EXPIRY_DAYS, SCOPES


class CreateApiKeyForm(FlaskForm):
    name = StringField("Key name", validators=[DataRequired(), Length(max=64)])
    scopes = SelectMultipleField(
        "Scopes",
        choices=[SelectChoice(s, s) for s in SCOPES],
        widget=widgets.ListWidget(prefix_label=False),
        option_widget=widgets.CheckboxInput(),
        validators=[DataRequired(message="Choose at least one scope.")],
    )
    expires_days = IntegerField(
        "Expires after (days; leave empty for no expiry)",
        validators=[Optional(), NumberRange(min=1, max=MAX_EXPIRY_DAYS)],
    )
    submit = SubmitField("Create key")
