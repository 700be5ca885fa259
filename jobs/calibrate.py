"""Ray job: `ray job submit --working-dir . -- python jobs/calibrate.py --config conf/<preset>.yaml [key=value ...]`."""
import _entry

_entry.run("calibrate")
