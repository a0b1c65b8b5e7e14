"""Performance: the model of build and solve (pure), the machine probe and the scaling study."""
