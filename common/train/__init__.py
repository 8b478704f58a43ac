"""The shared training loop; backends plug in through :class:`common.train.backend.Backend`."""
