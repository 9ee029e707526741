"""Email: the words (``render``), the MIME message (``message``) and SMTP (``smtp``)."""

from poller.mail.message import OutgoingMessage, build_message, message_id_for
from poller.mail.render import (
    AlertContent,
    RenderedEmail,
    forecast_line,
    format_amount,
    format_credits,
    format_detected_at,
    format_rate,
    format_runway,
    one_line,
    render_email,
    render_subject,
)
from poller.mail.smtp import (
    NO_SMTPUTF8,
    DeliveryError,
    SmtpTransport,
    is_permanent,
    reply_text,
    smtp_transport,
)

__all__ = [
    "NO_SMTPUTF8",
    "AlertContent",
    "DeliveryError",
    "OutgoingMessage",
    "RenderedEmail",
    "SmtpTransport",
    "build_message",
    "forecast_line",
    "format_amount",
    "format_credits",
    "format_detected_at",
    "format_rate",
    "format_runway",
    "is_permanent",
    "message_id_for",
    "one_line",
    "render_email",
    "render_subject",
    "reply_text",
    "smtp_transport",
]
