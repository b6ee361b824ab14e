"""The refusal every validator raises, with its D-Bus error name.

vnetd sends a VnetError as the D-Bus error `dbus_name` with the message as its text; the
client raises the same message before sending when it checks a value itself.
"""

ERROR_PREFIX = "org.qemuvnet.Vnet1.Error."


class VnetError(Exception):
    """Base class: a refusal or failure that the caller should see as a named error."""

    dbus_name = ERROR_PREFIX + "Failed"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(VnetError):
    """A name, address, number or option is not acceptable; nothing was changed."""

    dbus_name = ERROR_PREFIX + "InvalidArgument"
