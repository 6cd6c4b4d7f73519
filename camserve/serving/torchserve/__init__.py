"""Running TorchServe for camserve: archives, the server's lifecycle, health, Java."""
