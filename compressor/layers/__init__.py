"""Custom Keras layers that compressed models hold; they import nothing from the rest of the package."""
