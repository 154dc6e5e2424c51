"""What runs inside mitmproxy: the addon, the loopback bridge and each session's I/O around the core."""
