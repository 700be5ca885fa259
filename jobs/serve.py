"""Ray job: `ray job submit --working-dir . -- python jobs/serve.py --config conf/<preset>.yaml [key=value ...]`."""
import _entry

_entry.run("serve")
