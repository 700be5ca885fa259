"""Ray job for the whole pipeline:
`ray job submit --working-dir . -- python jobs/pipeline.py --config conf/<preset>.yaml [--from STAGE] [key=value ...]`."""
import _entry

_entry.run("run")
