"""The library behind the six scripts at the project's root: each module holds one concern, and importing
the package loads none of them. The README's "The layout" table says which module holds what.
"""
