"""The admin user list is keyset-paginated, so it stays fast with many users."""

from __future__ import annotations

from flask import Flask

from helpers import create_user, login, optional_2fa_for_admins, page


def test_users_list_pages_by_username(app: Flask) -> None:
    optional_2fa_for_admins(app)
    create_user(app, "admin", "admin")
    for i in range(55):
        create_user(app, f"user{i:03d}")
    client = app.test_client()
    assert login(client, "admin").status_code == 302
    first = page(client.get("/admin/users"))
    names = [row["data-username"] for row in first.select("tr[data-username]")]
    assert len(names) == 50 and names == sorted(names, key=str.casefold)
    nxt = first.find(id="users-next")
    assert nxt is not None
    second = page(client.get(nxt["href"]))
    rest = [row["data-username"] for row in second.select("tr[data-username]")]
    assert len(rest) == 6 and not set(rest) & set(names)
    assert second.find(id="users-next") is None
