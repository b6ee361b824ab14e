"""The children vnetd runs: the supervisor, their users and groups, files in directories a
child may write."""
