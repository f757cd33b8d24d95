from fullstack_ml.stage import run
from stages.compress import main

run(main)
