<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<meta name="referrer" content="no-referrer">
<title>{{title}} · PausePoint</title>
<link rel="stylesheet" href="/static/pausepoint.css">
</head>
<body>
<main>
{{!base}}
</main>
<footer>PausePoint</footer>
</body>
</html>
