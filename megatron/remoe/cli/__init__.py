"""Entry points: the `remoe` console script (`main`), `remoe demo` (`demo`) and the launcher that
starts a training run in its own process (`launch`)."""
