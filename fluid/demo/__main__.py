"""``python -m fluid.demo``."""

from fluid.demo import main

main()
