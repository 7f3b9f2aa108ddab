# End-to-end RL demo of megatron-pr2 (thin wrapper around megatron_pr2.rl.demo).
#
#   python examples/rl_demo.py                 # = python -m megatron_pr2.rl.demo --compare
#   python examples/rl_demo.py --quick         # smoke-sized comparison
#   python examples/rl_demo.py --mode pr2      # one run (any flag of megatron_pr2.rl.demo works)

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_pr2.rl.demo import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    # The comparison is the default; "--mode X" (or --single) asks for one run instead.
    single = any(a == "--mode" or a.startswith("--mode=") for a in argv) or "--single" in argv
    argv = [a for a in argv if a != "--single"]
    if not single and "--compare" not in argv:
        argv = ["--compare"] + argv
    sys.exit(main(argv))
