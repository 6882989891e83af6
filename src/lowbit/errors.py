"""The one exception type lowbit raises for bad input.

Every message is one sentence that names the file, tensor or option at fault, so the
command line can print it as it is and exit non-zero.
"""


class LowbitError(ValueError):
    """Bad input or an unsupported request, explained in one sentence."""
