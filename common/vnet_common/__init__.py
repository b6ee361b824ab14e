"""What vnetd and its clients share: names and their validators, limits, the D-Bus contract,
the network options, the MAC registry's keys and the definitions' TOML writer.

Standard library only: the client (dbus-fast) and the daemon (dbus-fast, pyroute2) both
import it, and so can tools that have neither.
"""
