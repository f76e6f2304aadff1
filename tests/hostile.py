"""What a hostile checkpoint holds: an object whose unpickling runs a shell command (``touch MARKER``).

The checkpoint-safety tests plant it wherever a loader of the project reads and check that the marker
file never appears; tests/test_checkpoint_safety.py shows that plain unpickling does run it.
"""
import os


class CodeRunningPickle:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
