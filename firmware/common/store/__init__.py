"""Durable storage: atomic file replacement and the atomic TinyDB storage over it."""
