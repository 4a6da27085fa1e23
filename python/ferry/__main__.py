"""``python -m ferry``: what this build of the package contains."""

import ferry

print(f"ferry {ferry.__version__}: protocols {', '.join(ferry.COMPILED_PROTOCOLS)}")
