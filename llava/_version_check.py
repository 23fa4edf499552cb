"""Fail early, with the fix in the message, when the installed transformers is not the tested release."""

from importlib.metadata import PackageNotFoundError, version

TESTED_TRANSFORMERS = "5.23.0"


def check_transformers() -> None:
    try:
        found = version("transformers")
    except PackageNotFoundError:
        raise ImportError(
            f"llava needs transformers=={TESTED_TRANSFORMERS}, which is not installed: "
            f"pip install 'transformers=={TESTED_TRANSFORMERS}'"
        ) from None
    if found.split("+")[0] != TESTED_TRANSFORMERS:
        raise ImportError(
            f"llava is tested with transformers=={TESTED_TRANSFORMERS} but {found} is installed. "
            f"Install the tested release with: pip install 'transformers=={TESTED_TRANSFORMERS}' "
            "(or set LLAVA_SKIP_VERSION_CHECK=1 to try another release at your own risk)."
        )
