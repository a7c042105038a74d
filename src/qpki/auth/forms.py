"""Flask-WTF forms of the /auth pages (field names are part of the interface contract)."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import HiddenField, PasswordField, StringField, SubmitField
from wtforms.validators import DataRequired, EqualTo, Length, Optional

CODE_LENGTH = Length(max=32, message="That is not a verification code.")


class LoginForm(FlaskForm):
    username = StringField("Username", validators=[DataRequired(), Length(max=254)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=1024)])
    next = HiddenField(validators=[Optional(), Length(max=2048)])
    submit = SubmitField("Sign in")


class VerifyForm(FlaskForm):
    code = StringField(
        "Verification code",
        validators=[
            DataRequired(message="Enter the code from your app or a backup code."),
            CODE_LENGTH,
        ],
    )
    submit = SubmitField("Verify")


class SetupConfirmForm(FlaskForm):
    code = StringField(
        "6-digit code from your app",
        validators=[DataRequired(message="Enter the 6-digit code from your app."), CODE_LENGTH],
    )
    submit = SubmitField("Verify and enable")


class ReauthForm(FlaskForm):
    """Password, plus a current code when 2FA is on (step-up for sensitive changes)."""

    password = PasswordField("Your password", validators=[DataRequired(), Length(max=1024)])
    code = StringField("Current verification code", validators=[Optional(), CODE_LENGTH])
    next = HiddenField(validators=[Optional(), Length(max=2048)])


class DisableMFAForm(ReauthForm):
    submit = SubmitField("Disable 2FA")


class RegenerateForm(ReauthForm):
    submit = SubmitField("Regenerate backup codes")


class ChangePasswordForm(FlaskForm):
    current_password = PasswordField(
        "Current password", validators=[DataRequired(), Length(max=1024)]
    )
    new_password = PasswordField(
        "New password",
        validators=[DataRequired(), Length(min=12, max=256, message="Use 12 to 256 characters.")],
    )
    confirm_password = PasswordField(
        "Repeat new password",
        validators=[DataRequired(), EqualTo("new_password", message="The passwords differ.")],
    )
    submit = SubmitField("Change password")


class PostForm(FlaskForm):
    """A bare form: a button that posts with a CSRF token (logout, end session)."""

    submit = SubmitField("Submit")
