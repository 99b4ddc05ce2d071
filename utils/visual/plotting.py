"""matplotlib for the figure scripts, or one clear line saying how to get it.

The figures use ``matplotlib.figure.Figure`` + ``savefig`` directly: no pyplot, so no GUI
backend and no global state, on a head-less machine too.
"""
from utils.runtime.errors import UserError


class MatplotlibMissing(UserError, ImportError):
    """matplotlib cannot be imported; the message says what needed it and how to install it."""


def figure_class(purpose: str):
    """``matplotlib.figure.Figure``, or :class:`MatplotlibMissing` naming ``purpose``."""
    try:
        # The package itself first: importing a submodule that is already loaded would not
        # notice a matplotlib that has been removed (or blocked in sys.modules) since.
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError:
        raise MatplotlibMissing(f"matplotlib is not installed (needed for {purpose}); "
                                "install it with: pip install matplotlib") from None
    return Figure
