"""The notebook face: magics and views over the engine."""
