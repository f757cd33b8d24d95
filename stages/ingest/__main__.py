from fullstack_ml.stage import run
from stages.ingest import main

run(main)
