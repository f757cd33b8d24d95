from fullstack_ml.stage import run
from stages.predict import main

run(main)
