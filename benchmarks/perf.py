"""Performance figures of issue #10; the same as ``python -m harness bench perf`` (see harness/perf.py)."""
from harness.perf import main

if __name__ == "__main__":
    main()
