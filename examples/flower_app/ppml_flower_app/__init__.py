"""A Flower app (Message API) running ppml_fast's strategies; see examples/flower_app/README.md."""
