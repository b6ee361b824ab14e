"""Kernel adapters: netlink links (pyroute2 and one hand-built RTM_NEWLINK) and tun ioctls."""
