"""Code both modules run: the optical link, messages, crypto, storage, GPIO and config."""
