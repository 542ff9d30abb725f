"""Progress of long computations: a caller's callback, and a bar or a text line.

``Progress(total, desc, progress, callback)``: after each unit of work,
``update(n)`` calls ``callback(done, total)`` (``total`` None when unknown) and,
with ``progress=True``, advances a ``tqdm`` bar where tqdm is installed, or
rewrites one plain text line on stderr where it is not.
"""

import sys

__all__ = ["Progress"]


class Progress:
    """Report ``done`` out of ``total`` units to a callback and, optionally, a bar."""

    def __init__(self, total, desc, progress=False, callback=None):
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        self.total, self.desc, self.callback = total, desc, callback
        self.done = 0
        self.bar = None
        self.text = False
        if progress:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # optional: a plain line instead
                self.text = True
            else:
                self.bar = tqdm(total=total, desc=desc, leave=False)

    @property
    def active(self):
        """Whether anyone listens (else callers may skip the bookkeeping)."""
        return self.callback is not None or self.bar is not None or self.text

    def update(self, n=1):
        """Count ``n`` more units done."""
        self.done += n
        if self.callback is not None:
            self.callback(self.done, self.total)
        if self.bar is not None:
            self.bar.update(n)
        elif self.text:
            total = "?" if self.total is None else self.total
            print(f"\r{self.desc}: {self.done}/{total}", end="", file=sys.stderr, flush=True)

    def close(self):
        """End the bar or the text line."""
        if self.bar is not None:
            self.bar.close()
        elif self.text:
            print(file=sys.stderr, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
