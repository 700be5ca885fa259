"""Ray job: `ray job submit --working-dir . -- python jobs/train_bc.py --config conf/<preset>.yaml [key=value ...]`."""
import _entry

_entry.run("train-bc")
