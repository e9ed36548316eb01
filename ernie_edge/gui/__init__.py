"""ernie_edge.gui: the Qt desktop chat app (Qt is imported only under this package)."""
