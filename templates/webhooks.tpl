% rebase('dashboard.tpl', title='Webhooks', here='webhooks')
<h1>Webhooks</h1>
% if not webhooks:
<p id="empty">No endpoints in {{'live' if caller.livemode else 'test'}} mode yet.</p>
% else:
<div class="scroll">
<table id="webhooks">
  <thead><tr><th scope="col">URL</th><th scope="col">Events</th><th scope="col">Status</th><th scope="col">Added (UTC)</th></tr></thead>
  <tbody>
% for webhook in webhooks:
    <tr>
      <td class="text"><a href="/dashboard/webhooks/{{webhook['webhook_id']}}">{{webhook['url']}}</a></td>
      <td>{{', '.join(webhook['events'])}}</td>
      <td>{{webhook['status']}}</td>
      <td>{{webhook['created_at'].replace('T', ' ').rstrip('Z')}}</td>
    </tr>
% end
  </tbody>
</table>
</div>
% end
<h2>Add an endpoint</h2>
% if error:
<p class="error" role="alert">{{error}}</p>
% end
<form method="post" action="/dashboard/webhooks" class="stack">
  <input type="hidden" name="csrf" value="{{csrf}}">
  <label for="url">URL</label>
  <input id="url" name="url" type="url" required maxlength="2048" placeholder="https://agents.example.com/pausepoint" value="{{values.get('url', '')}}">
  <fieldset>
    <legend>Events</legend>
% for event in events:
    <label class="check"><input type="checkbox" name="event:{{event}}" value="on"{{!' checked' if values.get('event:' + event) or (not values and event in ticked) else ''}}> {{event}}</label>
% end
  </fieldset>
  <label for="secret">Signing secret (optional: leave empty and one is made and shown once)</label>
  <input id="secret" name="secret" autocomplete="off" minlength="16" maxlength="256">
  <label for="webhook-password">Your password (an endpoint is sent the links that answer your pauses)</label>
  <input id="webhook-password" name="password" type="password" autocomplete="current-password" required>
  <button type="submit">Add endpoint</button>
</form>
