"""Ray job: `ray job submit --working-dir . -- python jobs/select_policy.py --config conf/<preset>.yaml [key=value ...]`."""
import _entry

_entry.run("select-policy")
