"""Code that runs on the gateway's two Raspberry Pis (and on its optional isolator)."""
