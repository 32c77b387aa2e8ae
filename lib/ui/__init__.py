"""Interactive front ends on top of the studies and their figures (ipywidgets); nothing below
imports them."""
