"""Ray job: `ray job submit --working-dir . -- python jobs/build_pairs.py --config conf/<preset>.yaml [key=value ...]`."""
import _entry

_entry.run("build-pairs")
