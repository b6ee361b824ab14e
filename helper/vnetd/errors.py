"""Named errors. Each maps to one D-Bus error name; the message is a sentence for a person."""

from vnet_common.errors import ERROR_PREFIX, InvalidArgument, VnetError


class NotFound(VnetError):
    dbus_name = ERROR_PREFIX + "NotFound"


class Exists(VnetError):
    dbus_name = ERROR_PREFIX + "Exists"


class NotRunning(VnetError):
    dbus_name = ERROR_PREFIX + "NotRunning"


class Busy(VnetError):
    dbus_name = ERROR_PREFIX + "Busy"


class QuotaExceeded(VnetError):
    dbus_name = ERROR_PREFIX + "QuotaExceeded"


class Failed(VnetError):
    """The kernel or a child process refused; the state was rolled back."""

    dbus_name = ERROR_PREFIX + "Failed"


class NotOwner(VnetError):
    """The VM name, MAC, address or object belongs to another user."""

    dbus_name = ERROR_PREFIX + "NotOwner"


class AccessDenied(VnetError):
    dbus_name = "org.freedesktop.DBus.Error.AccessDenied"


class LimitsExceeded(VnetError):
    """A caller is past a limit on calls at once (in flight, or waiting for polkit)."""

    dbus_name = "org.freedesktop.DBus.Error.LimitsExceeded"


class InteractiveAuthorizationRequired(VnetError):
    dbus_name = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"


ALL_ERRORS = (
    InvalidArgument,
    NotFound,
    Exists,
    Busy,
    NotRunning,
    QuotaExceeded,
    NotOwner,
    Failed,
    AccessDenied,
    InteractiveAuthorizationRequired,
)
