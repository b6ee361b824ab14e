"""qemu-vnet client: the `vnet-client` command and a Python library for VM managers.

    from vnet_client import Client

The names are imported on first use, so that `vnet-bridge-helper`, which QEMU runs for every
`-netdev bridge`, does not pay for dbus-fast and asyncio (it uses `vnet_client.minibus`).
"""

__all__ = ["Attachment", "Client", "VnetClientError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'vnet_client' has no attribute {name!r}")
