# Figures registered with report() (placeholder until it lands)
