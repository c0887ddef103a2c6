"""Performance measurements. Each benchmark prints one JSON object; none ever fails on a slow machine."""
