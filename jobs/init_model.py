"""Ray job: `ray job submit --working-dir . -- python jobs/init_model.py --config conf/<preset>.yaml [key=value ...]`."""
import _entry

_entry.run("init-model")
