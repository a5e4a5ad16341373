from glyph_engine.cli import main

main()
