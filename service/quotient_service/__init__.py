"""Quotient."""
