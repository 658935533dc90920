from loraplace.cli import app

app()
