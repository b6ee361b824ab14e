"""Pure renderers: what the kernel and the children are given (nftables JSON, dnsmasq and
dhcpd configurations, FRR's fragment, vde_switch's command line)."""
