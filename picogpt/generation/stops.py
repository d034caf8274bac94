"""Stop strings: checking them, and `StopText`, a sample's text cut before the first one, released
only once no tail of it can still turn out to begin one."""



MAX_STOPS = 16
MAX_STOP_CHARS = 1000  # per stop string: the hold-back search costs its length per token


def check_stop(stop):
    """`stop` as a tuple of strings: None (none), one string, or a list of up to 16 non-empty
    strings; anything else is a ValueError naming `stop`."""
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    if len(stops) > MAX_STOPS:
        raise ValueError(f"stop takes at most {MAX_STOPS} strings, got {len(stops)}")
    for s in stops:
        if not isinstance(s, str):
            raise ValueError(f"stop must be a string or a list of strings, got {s!r} in it")
        if not 0 < len(s) <= MAX_STOP_CHARS:
            raise ValueError(f"a stop string must have 1 to {MAX_STOP_CHARS} characters, "
                             f"got {len(s)}")
    return tuple(dict.fromkeys(stops))


class StopText:
    """A sample's text as it grows, cut before the first stop string, and how much of it is safe
    to show: never a tail that may turn out to be the start of a stop string."""

    def __init__(self, stops):
        self.stops = stops
        self.longest = max(map(len, stops), default=0)
        self.text = ""
        self.released = 0  # text[:released] has been shown
        self.stopped = False

    def add(self, piece):
        """Append `piece`; return the text that became safe to show (maybe "")."""
        if self.stopped or not piece:
            return ""
        start = max(0, len(self.text) - self.longest + 1)  # a new match ends inside `piece`
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self.release_all()
        return self._release(len(self.text) - self._held())

    def release_all(self):
        """The rest of the text: there is no more to come."""
        return self._release(len(self.text))

    def _held(self):
        """The length of the longest end of the text that is the beginning of a stop string."""
        for k in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def _release(self, end):
        piece = self.text[self.released : end]
        self.released = max(self.released, end)
        return piece
