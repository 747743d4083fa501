"""Memory and FLOPs planning: what a layout needs per GPU, and which layouts fit."""
