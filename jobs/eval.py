"""Ray job: `ray job submit --working-dir . -- python jobs/eval.py --config conf/<preset>.yaml [key=value ...]`."""
import _entry

_entry.run("eval")
