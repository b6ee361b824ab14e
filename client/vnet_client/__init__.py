"""qemu-vnet client: the `vnet-client` command and a Python library for VM managers."""

from .api import Client, VnetClientError

__all__ = ["Client", "VnetClientError"]
__version__ = "0.1.0"
